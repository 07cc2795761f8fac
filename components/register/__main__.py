from components import exiting

exiting.run("components.register.main")
