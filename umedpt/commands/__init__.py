"""Commands that are not Trainer methods (``umedpt <command> ...``), one module each with a
``main(args) -> int``; :data:`umedpt.cli.COMMANDS` maps command names to them.

Commands sit on top: they may use training (``umedpt.module``), probes and data; those never
import them (the old paths ``umedpt.data.check.main``, ``umedpt.probe.main``,
``umedpt.mllm.evaluate.main`` and ``umedpt.data.pseudo`` forward to them when used).

======================  ========================================================================
``data``                ``umedpt data check``: every task's data checked before training;
                        ``umedpt data optimize``: every task's data as litdata chunks
``probe``               ``umedpt probe`` / ``lightning probe``: frozen encoders on held-out tasks
``pseudo``              ``umedpt pseudo-label``: cross-task pseudo labels into a new manifest
``mllm_evaluate``       ``umedpt mllm-evaluate``: scores of an MLLM predict run
``diagnose``            ``umedpt diagnose``: task interference and Fisher spectrum of checkpoints
======================  ========================================================================
"""
