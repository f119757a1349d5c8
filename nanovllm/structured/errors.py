"""The error a structured-output or tool-calling request field gets: a ValueError naming the field."""

from __future__ import annotations


class ParameterError(ValueError):
    """A request field is malformed or cannot be honoured. `param` names it the way the request
    spells it (e.g. "response_format.json_schema.schema", "tools[1].function.name"), so a server
    can put it in an OpenAI error body; the message starts with the same name."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
