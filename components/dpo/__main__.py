from components import exiting

exiting.run("components.dpo.main")
