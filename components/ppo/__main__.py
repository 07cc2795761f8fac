from components.ppo.main import main

main()
