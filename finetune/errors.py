"""One error type for everything the user can fix.

The CLI turns a `UserError` into exit code 2 and one line on stderr of the form
`error: <where>: <what>. <fix>`; anything else is a bug in finetune (exit 1).
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a recipe, a record, a file, an adapter. Never a bug in finetune."""

    def __init__(self, where: str, what: str, fix: str = "", *, more: list[UserError] | None = None):
        self.where = where
        self.what = what.rstrip(".")
        self.fix = fix
        self.more = more or []
        super().__init__(self.line())

    def line(self) -> str:
        text = f"{self.where}: {self.what}."
        if self.fix:
            text += f" {self.fix.rstrip('.')}."
        return text

    def lines(self) -> list[str]:
        return [self.line()] + [e.line() for e in self.more]


class RecipeErrors(UserError):
    """Several recipe problems reported together, so the user fixes them in one pass."""

    def __init__(self, errors: list[UserError]):
        first, rest = errors[0], errors[1:]
        super().__init__(first.where, first.what, first.fix, more=rest)
        self.errors = errors
