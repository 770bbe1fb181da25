"""The project's user-facing error, and keeping secrets out of what users see."""

import re

_TOKEN_LIKE = re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")


class DreamBoothError(Exception):
    """A problem the user can fix: bad flag, bad file, missing package.

    The message is one line naming the flag or file and what to do; the
    scripts' entry points print it without a traceback.
    """


def redact(text: str, token: str | None) -> str:
    """``text`` with ``token`` (and anything shaped like a Hugging Face token) hidden."""
    if token:
        text = text.replace(token, "<redacted>")
    return _TOKEN_LIKE.sub("<redacted>", text)


def first_reason(error: BaseException, limit: int = 300) -> str:
    """The line of a library's (often multi-line) message that says what went wrong."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = next((line for line in lines if "mismatch" in line), lines[0] if lines else type(error).__name__)
    return reason if len(reason) <= limit else reason[:limit] + "..."


def error_chain(error: BaseException, limit: int = 10) -> list[BaseException]:
    """``error`` and the errors behind it (``raise ... from``, or raised while handling), nearest
    first: the library error a wrapper's message hides."""
    chain, cause = [], error
    while cause is not None and len(chain) < limit:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    return chain
