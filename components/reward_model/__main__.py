from components import exiting

exiting.run("components.reward_model.main")
