"""One module per subcommand (memray-style); cli.py discovers them."""
