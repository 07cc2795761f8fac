from components import exiting

exiting.run("components.evaluate.main")
