"""Who sent an alert action, and so what they may do (security review H4).

An action on ``alert-actions`` names its sender (``by``); its own ``role`` field is never
believed. The worker resolves the role from the user directory, the same users file the
inbox and the actions API authenticate against (``INBOX_USERS_FILE``, re-read when it
changes). An action from a user the directory does not know is refused
(``action_unknown_user``); what the resolved role may do is decided by
:mod:`alerts.policy` inside the lifecycle (``action_forbidden``).
"""
from __future__ import annotations

from schemas.alert import AlertAction, Role
from schemas.errors import Reason, Rejected

from .inbox.auth import ReloadingUserDirectory, UserDirectory

__all__ = ["ActionAuthority"]


class ActionAuthority:
    def __init__(self, directory: UserDirectory) -> None:
        self.directory = directory

    @classmethod
    def from_file(cls, path: str) -> "ActionAuthority | None":
        """None without a configured file (then every action is refused)."""
        path = (path or "").strip()
        return cls(ReloadingUserDirectory(path)) if path else None

    def role_of(self, action: AlertAction) -> Role:
        user = self.directory.get(action.by)
        if user is None:
            # the name is sender-controlled: bounded, and not logged by the caller at INFO
            raise Rejected(Reason.ACTION_UNKNOWN_USER, f"sender {action.by[:64]!r} is not in the user directory")
        return user.role
