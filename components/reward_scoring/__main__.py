from components import exiting

exiting.run("components.reward_scoring.main")
