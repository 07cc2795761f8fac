from components.reward_scoring.main import main

main()
