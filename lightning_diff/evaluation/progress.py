"""Progress of the long loops of ``sample`` and ``evaluate`` (sampling, reference statistics), on a terminal and
in a log.

rich's bar draws nothing until it ends where stdout is not a terminal (nohup, a log file, SLURM): a 50,000-image
evaluation was silent for hours. ``LineProgress`` keeps rich's interface (``add_task``, ``advance``) and prints
plain lines there instead; on a terminal it keeps the bar.
"""

from __future__ import annotations

from datetime import timedelta

from rich.progress import Progress, Task, TaskID

__all__ = ["LineProgress", "progress_bar"]


def progress_bar(enabled: bool = True, **kwargs) -> Progress:
    """The progress display of a loop: ``LineProgress(**kwargs)``, or nothing at all when not ``enabled``."""
    return LineProgress(**kwargs) if enabled else Progress(disable=True)


class LineProgress(Progress):
    """rich's transient ``Progress`` that also prints plain lines,
    ``sampling (heun, 18 steps): 640/50000 images (1%), 3.2 images/s, elapsed 0:03:20, ETA 4:20:00``.

    Where the console is not a terminal (the bar is then off) a task gets a line once its first batch is timed
    (the estimated time up front), then at each ``1 / fractions`` of its total or after ``every_seconds``,
    whichever comes first, and when it completes. On a terminal the bar shows the rest; a task gets one line,
    after its first batch, when its estimated time exceeds ``estimate_over_s``. Tasks need a ``total``; the rate
    is the mean since the task started.
    """

    def __init__(self, *columns, unit: str = "images",
                 fractions: int = 10,  # a line at each tenth of a task
                 every_seconds: float = 30.0,  # and at least one every 30 s
                 estimate_over_s: float = 600.0,  # on a terminal: state estimates over 10 minutes
                 **kwargs):
        kwargs.setdefault("transient", True)
        super().__init__(*columns, **kwargs)
        self.plain = not self.console.is_terminal
        self.disable = self.disable or self.plain
        self.unit, self.fractions, self.every_seconds = unit, fractions, every_seconds
        self.estimate_over_s = estimate_over_s
        self._printed: dict[TaskID, tuple[float, int]] = {}  # task -> (time, fractions done) at its last line

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        task = self._tasks[task_id]
        if self._due(task):
            self.console.print(self.line(task), markup=False, highlight=False, soft_wrap=True)

    def _due(self, task: Task) -> bool:
        """Whether ``task`` gets a line now; remembers when it got one (or, on a terminal, its first batch)."""
        if not (task.completed and task.elapsed):  # no rate yet
            return False
        now, fractions = self.get_time(), int(task.completed * self.fractions // task.total)  # exact for integers
        last = self._printed.get(task.id)
        if last is None:
            due = self.plain or self._remaining(task) > self.estimate_over_s
            self._printed[task.id] = (now, fractions)
            return due
        due = self.plain and (fractions > last[1] or now - last[0] >= self.every_seconds or task.finished)
        if due:
            self._printed[task.id] = (now, fractions)
        return due

    def _remaining(self, task: Task) -> float:
        """Estimated seconds left: the rest of the total at the mean rate since the task started."""
        return (task.total - task.completed) * task.elapsed / task.completed

    def line(self, task: Task) -> str:
        """``<description>: <done>/<total> <unit> (<percent>), <rate> <unit>/s, elapsed <h:mm:ss>, ETA <h:mm:ss>``."""
        rate = task.completed / task.elapsed
        return (f"{task.description}: {task.completed:.0f}/{task.total:.0f} {self.unit} ({task.percentage:.0f}%), "
                f"{_number(rate)} {self.unit}/s, elapsed {_duration(task.elapsed)}, "
                f"ETA {_duration(self._remaining(task))}")


def _number(x: float) -> str:
    """Three significant digits, without an exponent: ``0.0123``, ``3.2``, ``1234``."""
    return f"{x:.3g}" if x < 1000 else f"{x:.0f}"


def _duration(seconds: float) -> str:
    """``h:mm:ss`` (``1 day, 2:03:04`` past a day)."""
    return str(timedelta(seconds=round(seconds)))
