"""The admin check as a gRPC server interceptor: one gate in front of the admin methods, none in the servicer.

Pattern of gRPC Python's ``examples/python/auth/token_based_auth_server.py``: the interceptor reads
the call's metadata before the handler runs and, when the bearer token is wrong, swaps in a
handler that only aborts. Calls that reach the servicer some other way (the fuzz tests call it
directly) simply have no gate in their path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import grpc

from license_server.auth import AdminAuth

# (method name, peer) of a refused call: counts and logs it.
RefusalHook = Callable[[str, str], None]


class AdminAuthInterceptor(grpc.ServerInterceptor):
    """UNAUTHENTICATED, with :meth:`AdminAuth.check`'s message, for admin calls without a valid token."""

    def __init__(self, auth: AdminAuth, service: str, methods: Iterable[str], on_refusal: RefusalHook | None = None):
        self._auth = auth
        self._guarded = {f"/{service}/{m}": m for m in methods}
        self._on_refusal = on_refusal

    def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        method = self._guarded.get(handler_call_details.method)
        if method is None:
            return continuation(handler_call_details)
        problem = self._auth.check(handler_call_details.invocation_metadata)
        if problem is None:
            return continuation(handler_call_details)
        return grpc.unary_unary_rpc_method_handler(self._refuse(method, problem))

    def _refuse(self, method: str, problem: str):
        def handler(_request: bytes, context: grpc.ServicerContext):
            if self._on_refusal is not None:
                self._on_refusal(method, context.peer())
            context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

        return handler
