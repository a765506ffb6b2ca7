"""Framework backends behind one trial interface.

Importing this package imports no framework: each backend lives in its own module
(``autobatch.backends.torch``, ``autobatch.backends.tensorflow``) and is loaded by
name through :func:`autobatch.registry.get_backend`.
"""

from autobatch.backends.base import Backend, TrialMeasurements, TrialProgress

__all__ = ["Backend", "TrialMeasurements", "TrialProgress"]
