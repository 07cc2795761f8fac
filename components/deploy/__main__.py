from components import exiting

exiting.run("components.deploy.main")
