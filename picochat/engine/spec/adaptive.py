"""Per-request control of how many tokens to draft, so prompts the drafts cannot predict lose little speed.

The engine reads ``k`` before proposing (0: do not speculate this step) and calls ``update`` after
every step with how many drafts it proposed and how many were accepted. The policy:

- start at ``k_max``;
- every draft accepted → k grows by one (up to ``k_max``);
- some accepted → k = accepted + 1 (the drafts held that far, so try one further);
- none accepted → k halves (at least 1), and after ``patience`` such steps in a row speculation
  switches off (k = 0);
- while off, every ``probe_every``-th step drafts one token (a probe): a hit switches speculation
  back on (and k grows from there), a miss switches it off for another ``probe_every`` steps;
- a step that proposed nothing (the proposer found no match) is no evidence and changes nothing,
  except that it counts towards the next probe while off.

So an adversarial request wastes at most ``patience`` short verifications and then one drafted
token per ``probe_every`` steps.
"""

from __future__ import annotations


class AdaptiveK:
    def __init__(self, k_max: int, patience: int = 4, probe_every: int = 16):
        assert k_max >= 1 and patience >= 1 and probe_every >= 1, (k_max, patience, probe_every)
        self.k_max, self.patience, self.probe_every = k_max, patience, probe_every
        self.k = k_max  # drafts to propose this step; 0 while speculation is off
        self._misses = 0  # consecutive steps whose drafts were all rejected
        self._steps_off = 0  # steps since speculation switched off or last probed

    def update(self, proposed: int, accepted: int) -> None:
        assert 0 <= accepted <= proposed, (proposed, accepted)
        if self.k == 0:
            self._steps_off += 1
            if self._steps_off >= self.probe_every:
                self.k, self._steps_off = 1, 0
        elif proposed == 0:
            return
        elif accepted == proposed:
            self.k, self._misses = min(self.k_max, self.k + 1), 0
        elif accepted > 0:
            self.k, self._misses = accepted + 1, 0
        else:
            self._misses += 1
            self.k = 0 if self._misses >= self.patience else max(1, self.k // 2)
