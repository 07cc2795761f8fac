from components import exiting

exiting.run("components.sft.main")
