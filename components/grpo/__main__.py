from components import exiting

exiting.run("components.grpo.main")
