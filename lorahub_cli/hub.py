"""All Hugging Face Hub I/O goes through huggingface_hub; this module turns its failures into one-line errors.

huggingface_hub reads HF_ENDPOINT, HF_TOKEN, HF_HOME and HF_HUB_OFFLINE itself,
so lorahub respects them by never overriding them.
"""

from __future__ import annotations

from contextlib import contextmanager

from .errors import HubError, HubUnreachableError, InputError, NotFoundError

TOKEN_HINT = "Check that your token may access it: run `hf auth login` or set HF_TOKEN."
OFFLINE_HINT = (
    "Check your connection, or point HF_ENDPOINT at a reachable Hub mirror; unset HF_HUB_OFFLINE if it is set."
)


def endpoint() -> str:
    """The Hub every call goes to (HF_ENDPOINT, as huggingface_hub read it); passed explicitly to each call."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def api():
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint(), library_name="lorahub")


def _is_network_failure(error: BaseException) -> bool:
    # The client's transport changed across releases (requests, httpx, httpx2):
    # recognise a failure to connect by its class names instead of importing each.
    names = {cls.__name__ for cls in type(error).__mro__}
    return bool(names & {"TransportError", "ConnectionError", "ConnectError", "Timeout", "TimeoutException"})


@contextmanager
def hub_errors(what: str, revision: str | None = None):
    """Translate huggingface_hub exceptions raised while working on `what` (a repo id) into LorahubErrors."""
    from huggingface_hub import errors

    try:
        yield
    except errors.GatedRepoError:
        raise HubError(
            f"'{what}' is gated: accept its terms on the Hub first.",
            "Then log in (hf auth login) or set HF_TOKEN.",
        ) from None
    except errors.RepositoryNotFoundError:
        raise NotFoundError(
            f"repository '{what}' was not found on {endpoint()}.",
            "Check the id; for a private repo set HF_TOKEN.",
        ) from None
    except errors.RevisionNotFoundError:
        raise NotFoundError(
            f"revision '{revision}' of '{what}' was not found.", "Give a branch, tag or 40-hex commit that exists."
        ) from None
    except errors.EntryNotFoundError as error:
        raise NotFoundError(f"a file of '{what}' was not found: {error}", "Check the repository's files.") from None
    except errors.OfflineModeIsEnabled:
        raise HubError(
            f"cannot reach the Hub for '{what}': HF_HUB_OFFLINE is set.", "Unset HF_HUB_OFFLINE to go online."
        ) from None
    except errors.HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", "?")
        hint = {401: TOKEN_HINT, 403: TOKEN_HINT}.get(
            status,
            OFFLINE_HINT if status == "?" or status >= 500 else f"The Hub said: {str(error).splitlines()[0][:200]}",
        )
        raise HubError(f"the Hub at {endpoint()} refused a request for '{what}' (HTTP {status}).", hint) from None
    except errors.HFValidationError as error:
        raise InputError(f"'{what}' is not a valid Hub repo id ({error}).", "Use NAMESPACE/NAME.") from None
    except OSError as error:
        # transformers reports a Hub it cannot reach, or a name that is neither a folder nor a repo, as OSError.
        text = str(error)
        if "couldn't connect" in text or _is_network_failure(error):
            raise HubUnreachableError(
                f"cannot reach the Hub at {endpoint()} for '{what}', and it is not in the local cache.",
                OFFLINE_HINT + " For a model on disk, pass its folder (--model-path).",
            ) from None
        if "not a valid model identifier" in text or "not a local folder" in text:
            raise NotFoundError(
                f"'{what}' is neither a local folder nor a model on {endpoint()}.",
                "Check the name, or give the folder of a local copy (--model-path).",
            ) from None
        raise
    except Exception as error:
        if _is_network_failure(error):
            raise HubUnreachableError(f"cannot reach the Hub at {endpoint()} for '{what}'.", OFFLINE_HINT) from None
        raise
