"""``python -m phema_cli``: the same as the ``phema`` console script."""

from phema_cli.app import main

main()
