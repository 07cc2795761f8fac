from components.grpo.main import main

main()
