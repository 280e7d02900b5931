"""OpenAI-compatible HTTP gateway in front of the scheduler (issue 20).

Stateless: every HTTP request becomes one scheduler call through the asyncio
SDK (``shortline.client``), so gateways scale out behind any load balancer and
a restart loses nothing but the requests in flight.
"""
