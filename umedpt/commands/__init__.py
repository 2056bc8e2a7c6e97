"""Commands that are not Trainer methods (``umedpt <command> ...``), one module each with a
``main(args) -> int``; :data:`umedpt.cli.COMMANDS` maps command names to them.

Commands sit on top: they may use training (``umedpt.module``) and data; data and the kinds
never import them.
"""
