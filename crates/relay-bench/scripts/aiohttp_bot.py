"""An aiohttp echo bot, the shape of a typical Python voice bot: webhooks answered with their
body, media WebSocket messages echoed. Usage: python3 aiohttp_bot.py PORT (pip install aiohttp)."""
import sys

from aiohttp import WSMsgType, web


async def echo(request):
    return web.Response(body=await request.read(), content_type="application/json")


async def media(request):
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


app = web.Application()
app.router.add_post("/api/incomingCall", echo)
app.router.add_post("/api/callbacks/{tail:.*}", echo)
app.router.add_get("/ws", media)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
