from components.dpo.main import main

main()
