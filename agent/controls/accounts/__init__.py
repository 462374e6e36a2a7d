"""The accounts guard (control.py); what it observes and wants (model.py); its judgement (assess.py)."""

from agent.controls.accounts.control import AccountsControl
from agent.controls.accounts.model import AccountsDesired, AccountsObserved, AdminState, UnsafePath

__all__ = ["AccountsControl", "AccountsDesired", "AccountsObserved", "AdminState", "UnsafePath"]
