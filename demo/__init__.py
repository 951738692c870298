"""`activeguard demo`: the top floor. It drives every server (license server, TorchServe, gateway)
and the audits end to end; nothing else in the project imports it."""
