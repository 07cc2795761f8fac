from components.sft.main import main

main()
