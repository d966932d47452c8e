"""How long-running work (fetching, loading, quantizing) reports progress to whoever shows it."""

from typing import Callable, Optional

# progress(description, fraction in 0..1 or None when unknown)
ProgressFn = Callable[[str, Optional[float]], None]
