"""SSH: the guard (control.py) and all it alone knows — sshd's config graph (sshd_config.py, model.py), the
lockout check (lockout.py), the strict profile's settings (strict.py), the proven key logins (keylogins.py),
the two-phase port move (portmove.py) and its coordinator (proofs.py), and the SSH ports (ports.py) that the
engine works out once per converge and hands to every guard. No other guard imports this package."""
