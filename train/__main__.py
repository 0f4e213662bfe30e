"""`python -m dynamicid.train ...` (and `accelerate launch -m dynamicid.train ...`): the dynamicid-train CLI."""

from dynamicid.train.cli import main

main(prog_name="dynamicid-train")
