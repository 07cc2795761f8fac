from components.reward_model.main import main

main()
