"""What a run reports while it trains: monitor backends and the log line (``monitor.py``) and the
``wall_clock_breakdown`` timers (``timers.py``)."""

from .monitor import Monitor, Throughput, format_log_line
from .timers import NoOpTimers, Timers, make_timers

__all__ = ["Monitor", "Throughput", "format_log_line", "Timers", "NoOpTimers", "make_timers"]
