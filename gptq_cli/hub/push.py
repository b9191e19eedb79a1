"""Publish a GPTQ checkpoint to the Hugging Face Hub (`gptq push`, SPEC §1).

Everything that can be refused is refused before the first request: the repo id, the token, and the
checkpoint itself (inspect's validity check). Then, with huggingface_hub:
create_repo(exist_ok=True), the branch for a --revision other than main, each file's upload (large
files go as LFS or Xet, as huggingface_hub and the server decide), and one commit holding every
file. The server is huggingface_hub's
endpoint: HF_ENDPOINT, read when the push runs, else the library's default; nothing here names a
host.

Model card rule: a README.md already in the checkpoint directory is the user's card and is sent
unchanged; otherwise gptq_cli.hub.modelcard builds one and it is sent as README.md. The directory
itself is never modified.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptq_cli import __version__
from gptq_cli.errors import GptqError, UsageError

CARD_FILE = "README.md"
HUB_TIMEOUT = 60.0  # seconds `gptq push` waits to connect and for each answer (--timeout)


@dataclass
class PushFile:
    """One file of the commit: read from `local_path`, or the bytes in `content` (the generated
    card)."""

    path_in_repo: str
    size: int
    local_path: Path | None = None
    content: bytes | None = None


@dataclass
class Upload:
    """What a push sends: the files (sorted by path, README.md among them) and the card's text."""

    checkpoint: Path
    repo_id: str
    files: list[PushFile]
    card: str
    card_generated: bool  # False: the checkpoint's own README.md is sent as it is
    bits: int

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": str(self.checkpoint),
            "repo_id": self.repo_id,
            "files": [{"path": f.path_in_repo, "size": f.size} for f in self.files],
            "bytes": self.total_bytes,
            "card": "generated" if self.card_generated else "kept (README.md)",
            "card_text": self.card,
        }


class CheckpointRefused(GptqError):
    """The checkpoint fails the validity check; `problems` lists what `gptq inspect` found."""

    def __init__(self, checkpoint: Path, problems: list[str]):
        self.problems = problems
        super().__init__(
            f"{checkpoint} fails the validity check ({len(problems)} problem(s)); nothing was "
            f"sent. Fix it first (see `gptq inspect {checkpoint}`)"
        )


def check_repo_id(repo_id: str) -> str:
    """The repo id if it is a valid "owner/name"; a one-line UsageError otherwise."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if repo_id.count("/") != 1:
        raise UsageError(
            f"repo id {repo_id!r} must be OWNER/NAME, e.g. my-org/Llama-2-7b-GPTQ-4bit"
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UsageError(f"invalid repo id: {' '.join(str(e).split())}") from e
    return repo_id


def hub_endpoint() -> str | None:
    """HF_ENDPOINT as set now (the library reads it only at import); None: huggingface_hub's
    default."""
    return os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or None


def hub_token() -> str:
    """The token from HF_TOKEN or the huggingface_hub login; UsageError when there is none."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise UsageError(
            "no Hugging Face token: set HF_TOKEN to a token with write access, or run "
            "`hf auth login`"
        )
    return token


def prepare_upload(checkpoint: str | Path, repo_id: str) -> Upload:
    """Check the repo id and the checkpoint (CheckpointRefused when inspect finds problems) and
    list what a push would send: every non-hidden file under the checkpoint, plus the generated
    card when it has none."""
    from gptq_cli.hub.modelcard import build_model_card
    from gptq_cli.inspection import inspect_checkpoint

    check_repo_id(repo_id)
    report = inspect_checkpoint(checkpoint)
    checkpoint = Path(report.path)
    if report.problems:
        raise CheckpointRefused(checkpoint, report.problems)
    files = [
        PushFile(p.relative_to(checkpoint).as_posix(), p.stat().st_size, local_path=p)
        for p in sorted(checkpoint.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(checkpoint).parts)
    ]
    user_card = checkpoint / CARD_FILE
    if user_card.is_file():
        return Upload(
            checkpoint,
            repo_id,
            files,
            user_card.read_text(encoding="utf-8", errors="replace"),
            card_generated=False,
            bits=report.quant.bits,
        )
    card = build_model_card(report, repo_id)
    files.append(PushFile(CARD_FILE, len(card.encode()), content=card.encode()))
    files.sort(key=lambda f: f.path_in_repo)
    return Upload(checkpoint, repo_id, files, card, card_generated=True, bits=report.quant.bits)


@contextmanager
def hub_timeouts(seconds: float) -> Iterator[None]:
    """huggingface_hub's HTTP client waiting at most `seconds` to connect and for each read or
    write (its default waits forever on a server that accepts the connection and never answers)."""
    import httpx2
    from huggingface_hub.utils import _http

    def bounded_client():
        client = _http.default_client_factory()
        client.timeout = httpx2.Timeout(seconds)
        return client

    _http.set_client_factory(bounded_client)
    try:
        yield
    finally:
        _http.set_client_factory(_http.default_client_factory)


def push_checkpoint(
    upload: Upload,
    *,
    token: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    timeout: float = HUB_TIMEOUT,
    on_file: Callable[[PushFile], None] | None = None,
) -> dict[str, Any]:
    """Send `upload` to the Hub in one commit; return where it went. `on_file` is called as each
    file has been uploaded (LFS/Xet) or checked (small files travel inside the commit). GptqError
    (UsageError for a refused token, an unreachable endpoint or one silent for `timeout` seconds)
    with one line when the Hub or the connection fails."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.utils import disable_progress_bars

    api = HfApi(endpoint=hub_endpoint(), token=token)
    message = (
        commit_message or f"Upload {upload.bits}-bit GPTQ checkpoint with gptq_cli {__version__}"
    )
    try:
        # the caller shows one bar for the whole push
        with disable_progress_bars(), hub_timeouts(timeout):
            repo_url = api.create_repo(
                upload.repo_id, private=True if private else None, exist_ok=True
            )
            if revision and revision != "main":
                api.create_branch(upload.repo_id, branch=revision, exist_ok=True)
            operations = [
                CommitOperationAdd(
                    f.path_in_repo, f.content if f.content is not None else str(f.local_path)
                )
                for f in upload.files
            ]
            for file, operation in zip(upload.files, operations):
                api.preupload_lfs_files(
                    upload.repo_id, additions=[operation], revision=revision, free_memory=False
                )
                if on_file:
                    on_file(file)
            commit = api.create_commit(
                upload.repo_id, operations, commit_message=message, revision=revision
            )
    except Exception as e:  # the boundary to the network library: every failure becomes one line
        raise hub_failure(e, upload.repo_id, api.endpoint, timeout) from e
    return {
        "repo_id": upload.repo_id,
        "url": str(repo_url),
        "revision": revision or "main",
        "commit_url": commit.commit_url,
        "commit_oid": commit.oid,
        "private": private,
        "files": [{"path": f.path_in_repo, "size": f.size} for f in upload.files],
        "bytes": upload.total_bytes,
        "card": "generated" if upload.card_generated else "kept (README.md)",
    }


def hub_failure(
    error: BaseException, repo_id: str, endpoint: str, timeout: float = HUB_TIMEOUT
) -> GptqError:
    """One line for a failed push: the HTTP status and the server's message when there is one
    (also when huggingface_hub wrapped the HTTP error in another exception); an endpoint that
    cannot be reached or does not answer in time; else the error itself."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    chain = [error]
    while (
        inner := chain[-1].__cause__ or chain[-1].__context__
    ) is not None and inner not in chain:
        chain.append(inner)
    http = next((e for e in chain if isinstance(e, HfHubHTTPError)), None)
    if http is None:
        silent = next((e for e in chain if isinstance(e, httpx2.TimeoutException)), None)
        if silent is not None:
            return UsageError(
                f"the Hub at {endpoint} did not answer within {timeout:g} s "
                f"({type(silent).__name__}); check HF_ENDPOINT and the network, or allow longer "
                f"with --timeout"
            )
        unreachable = next((e for e in chain if isinstance(e, httpx2.NetworkError)), None)
        if unreachable is not None:
            return UsageError(
                f"cannot reach the Hub at {endpoint} ({type(unreachable).__name__}: "
                f"{_one_line(unreachable)}); check HF_ENDPOINT and the network"
            )
        root = (
            "" if chain[-1] is error else f" ({type(chain[-1]).__name__}: {_one_line(chain[-1])})"
        )
        return GptqError(
            f"push to {repo_id} at {endpoint} failed: {type(error).__name__}: "
            f"{_one_line(error)}{root}"
        )
    status = http.response.status_code
    detail = _one_line(http.server_message or http.response.reason_phrase)
    if status == 401:
        return UsageError(
            f"the Hub at {endpoint} refused the token (401: {detail}); set HF_TOKEN to a valid "
            f"token or run `hf auth login`"
        )
    if status == 403:
        return UsageError(
            f"the token may not write to {repo_id} (403: {detail}); use a token with write "
            f"access to that namespace"
        )
    return GptqError(
        f"push to {repo_id} failed: the Hub answered {status} to {http.response.request.method} "
        f"{http.response.request.url.path}: {detail}"
    )


def _one_line(value: object) -> str:
    return " ".join(str(value).split()) or "no details"
