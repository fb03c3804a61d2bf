"""One error type for everything the user can fix.

The CLI turns a `UserError` into exit code 2 and one line on stderr of the form
`error: <where>: <what>. <fix>`; anything else is a bug in finetune (exit 1).
"""

from __future__ import annotations


def _one_line(text: object) -> str:
    # Messages often quote library exceptions, which span lines; the contract is one line each.
    return " ".join(str(text).split())


def _end(text: str) -> str:
    """`text` with exactly one closing mark: a question keeps its '?', anything else gets '.'."""
    text = text.rstrip(". ")
    return text if text.endswith(("?", "!")) else text + "."


class UserError(Exception):
    """Bad input: a recipe, a record, a file, an adapter. Never a bug in finetune."""

    def __init__(self, where: str, what: str, fix: str = "", *, more: list[UserError] | None = None):
        self.where = _one_line(where) or "input"  # never an empty place: the contract names one
        self.what = _one_line(what).rstrip(".")
        self.fix = _one_line(fix)
        self.more = more or []
        super().__init__(self.line())

    def line(self) -> str:
        text = f"{self.where}: {_end(self.what)}"
        if self.fix.strip(". "):
            text += f" {_end(self.fix)}"
        return text

    def lines(self) -> list[str]:
        return [self.line()] + [e.line() for e in self.more]


class RecipeErrors(UserError):
    """Several recipe problems reported together, so the user fixes them in one pass."""

    def __init__(self, errors: list[UserError]):
        # A nested group (e.g. from a helper that collects its own) is flattened, never truncated.
        errors = [x for e in errors for x in (e, *e.more)]
        if not errors:
            raise ValueError("RecipeErrors needs at least one error")
        first, rest = errors[0], errors[1:]
        super().__init__(first.where, first.what, first.fix, more=rest)
        self.errors = errors


class TrainingStopped(Exception):
    """A run stopped on request (Ctrl-C, SIGTERM) after writing a checkpoint it can resume from."""

    def __init__(self, step: int, checkpoint):
        super().__init__(f"stopped at step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint = step, checkpoint
