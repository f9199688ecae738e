"""``python -m dmn_neuro.cli`` runs the ``dmn-neuro`` command."""
from dmn_neuro.cli import main

main()
