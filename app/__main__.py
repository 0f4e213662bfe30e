from dynamicid.app.cli import main

main()
