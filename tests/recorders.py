"""The attention-mass recorders a backend makes, kept for a test to look at."""

from __future__ import annotations


def keeping_recorders(recorders: list):
    """A backend ``recorder_factory`` that also appends each MassRecorder it makes to ``recorders``."""
    from zerase_core.attention_mass import MassRecorder

    def factory(*args, **kwargs):
        recorders.append(MassRecorder(*args, **kwargs))
        return recorders[-1]

    return factory
