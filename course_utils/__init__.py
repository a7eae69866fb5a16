"""course_utils: the helper package behind the hands-on DPO course.

The notebooks show and explain; this package does. Modules are named after the
concept a learner meets: ``models``, ``presets``, ``data``, ``sentiment``,
``losses``, ``train``, ``evaluate``, ``plots``.
"""

__version__ = "0.1.0"
