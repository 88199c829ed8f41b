"""The errors a user can cause; the CLI prints the message as one line and exits non-zero, the
HTTP layer answers each kind with the status http/errors.py gives it."""

# Reasons a row is refused, recorded wherever they are met (at ingest, in a shard, at embed).
DECODE_ERROR = "decode error"  # bytes no image decoder takes
MISSING_URL = "missing url"  # a row with no URL to fetch


class UserError(Exception):
    """A bad command or missing precondition: the message names the problem and the fix."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class NoIndexError(UserError):
    """Nothing of the layer asked for (an index; embeddings to index) under the data root yet, or
    the build cannot be opened."""


class WithdrawnError(NoIndexError):
    """The model_version a Searcher serves has no published build any more (its CURRENT is gone)."""

    def __init__(self, model_version: str):
        super().__init__(f"no index for model_version {model_version!r} any more; run `rayclip index`")


class NoObjectError(UserError):
    """The store holds no image for the media_id asked for."""


class UnknownModelVersionError(UserError):
    """The model_version asked for has nothing of the layer, or several have and none was named.

    It carries the names present; how a caller names one is the caller's own spelling (`naming`):
    the Python argument by default, the CLI's flag, an HTTP field. An edge rewords it with
    `named_by`, so the sentence itself is written here once."""

    def __init__(self, layer: str, asked: str | None, present: list[str], naming: str = "model_version="):
        self.layer, self.asked, self.present, self.naming = layer, asked, list(present), naming
        listed = ", ".join(self.present)
        if asked:
            message = f"no {layer} for model_version {asked!r}; present: {listed} (name one with {naming})"
        else:
            message = f"several model_versions present ({listed}); pick one with {naming}"
        super().__init__(message)

    def named_by(self, naming: str) -> "UnknownModelVersionError":
        """The same error, telling the caller to name a model_version their way."""
        return UnknownModelVersionError(self.layer, self.asked, self.present, naming)
