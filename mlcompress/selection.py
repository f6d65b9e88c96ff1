"""Which tensors a lossy method compresses: ``--include GLOB`` / ``--exclude GLOB``.

Each method has its own rule for the tensors it can compress (quantization: conv/linear weights;
REC: tensors above a size; pruning: weight matrices). A selection narrows that rule by name,
and every tensor it leaves out is stored losslessly, so the file still restores the whole model.
Users need this because a model's tensors differ in sensitivity: on a small language model the
tied token embedding alone carries most of 4-bit quantization's divergence.

Rules (docs/quantize.md):

* Globs are shell patterns matched against the whole tensor name with :func:`fnmatch.fnmatchcase`
  (case-sensitive; ``*`` also matches dots, so ``*.attn.*`` works at any depth).
* With ``include`` globs, only names matching one of them are compressed; ``exclude`` globs then
  remove names; exclusion wins.
* Tied tensors are one tensor: a glob that matches any name of a tie selects (or excludes) the
  stored tensor, and so all its names.
* A glob that matches no name at all is an error naming it: a typo must not silently compress
  everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Callable, Iterable, Mapping

from mlcompress.errors import InputError, UsageError


@dataclass(frozen=True)
class Selection:
    """Include and exclude globs (empty: every tensor the method can compress)."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def validate(self) -> None:
        for flag, globs in (("--include", self.include), ("--exclude", self.exclude)):
            for glob in globs:
                if not isinstance(glob, str) or not glob.strip():
                    raise UsageError(f"{flag} needs a non-empty glob, got {glob!r}")

    @property
    def narrows(self) -> bool:
        return bool(self.include or self.exclude)

    def as_dict(self) -> dict[str, Any]:
        """For file metadata: only the globs that were given."""
        out: dict[str, Any] = {}
        if self.include:
            out["include"] = list(self.include)
        if self.exclude:
            out["exclude"] = list(self.exclude)
        return out

    def resolve(self, names: Iterable[str], aliases: Mapping[str, str] | None = None) -> Callable[[str], bool]:
        """The predicate ``chosen(name)`` over this checkpoint's names, after checking every
        glob matches one of them. ``aliases`` maps tied names to their stored name."""
        self.validate()
        names = list(names)
        aliases = dict(aliases or {})
        if not self.narrows:
            return lambda name: True
        stored = lambda name: aliases.get(name, name)  # noqa: E731 - one-line mapping
        for flag, globs in (("--include", self.include), ("--exclude", self.exclude)):
            for glob in globs:
                if not any(fnmatchcase(n, glob) for n in names):
                    raise InputError(f"{flag} {glob!r} matches no tensor of the model",
                                     hint="list the names with `mlcompress inspect` on a lossless encode, "
                                     "or check the glob's spelling")
        included = ({stored(n) for n in names if any(fnmatchcase(n, g) for g in self.include)}
                    if self.include else {stored(n) for n in names})
        excluded = {stored(n) for n in names if any(fnmatchcase(n, g) for g in self.exclude)}
        chosen = included - excluded
        return lambda name: stored(name) in chosen


def selection_of(include: Iterable[str] | None, exclude: Iterable[str] | None) -> Selection:
    """A :class:`Selection` from the CLI's repeatable options (None: not given)."""
    return Selection(tuple(include or ()), tuple(exclude or ()))
