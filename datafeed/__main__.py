"""python -m datafeed scan|cache: the data tools (datafeed/commands.py)."""
from datafeed.commands import main

main()
