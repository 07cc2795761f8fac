from components import exiting

exiting.run("components.ppo.main")
