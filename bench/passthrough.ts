/**
 * The floor for a Node broker: the least a correct node:http reverse proxy does. One server,
 * one keep-alive agent, the Authorization header swapped for the real credential, request
 * and response piped through (so streams stay unbuffered), hop-by-hop headers dropped.
 * Nothing is checked, counted or logged.
 *
 * Runs in its own child process (`bench.js passthrough`), reports its port over IPC and
 * exits when the bench goes away.
 */
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';

export function runPassThrough(): void {
  const upstreamPort = Number(process.env.BENCH_UPSTREAM_PORT);
  const authorization = `Bearer ${process.env.BENCH_SECRET ?? ''}`;
  const agent = new http.Agent({ keepAlive: true, maxSockets: 256, noDelay: true });
  const server = http.createServer({ noDelay: true, keepAliveTimeout: 5_000 }, (req, res) => {
    const headers: http.OutgoingHttpHeaders = { ...req.headers, authorization };
    delete headers.connection;
    delete headers['keep-alive'];
    const upstream = http.request({ host: '127.0.0.1', port: upstreamPort, method: req.method, path: req.url, headers, agent }, (upRes) => {
      const out: http.OutgoingHttpHeaders = { ...upRes.headers };
      delete out.connection;
      delete out['keep-alive'];
      delete out['transfer-encoding'];
      res.writeHead(upRes.statusCode ?? 502, out);
      upRes.pipe(res);
    });
    upstream.on('error', () => {
      if (!res.headersSent) res.writeHead(502);
      res.end();
    });
    res.on('close', () => {
      if (!res.writableFinished) upstream.destroy();
    });
    req.pipe(upstream);
  });
  server.listen(0, '127.0.0.1', () => process.send?.({ port: (server.address() as AddressInfo).port }));
  process.on('disconnect', () => process.exit(0));
  process.on('SIGTERM', () => process.exit(0));
}
