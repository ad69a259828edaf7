'use strict';
// A herd of stock grpc-js calls: CALLS concurrent Publish calls of EVENTS events each, from
// stubs generated at run time from proto/ and a service-config retry policy as a user writes
// it (5 attempts, RESOURCE_EXHAUSTED retryable; grpc-js honours grpc-retry-pushback-ms).
// Prints one JSON line: { client, calls, ok, failed, failures, seconds, seconds_to_last_ok }.
//
//   SLUICE_ADDR=localhost:50051 SLUICE_CERTS=certs CALLS=60 EVENTS=200 node bench/overload/herd.js
const path = require('node:path');
const fs = require('node:fs');
const crypto = require('node:crypto');
const modules = path.join(__dirname, '..', '..', 'clients', 'node', 'node_modules');
const grpc = require(path.join(modules, '@grpc', 'grpc-js'));
const protoLoader = require(path.join(modules, '@grpc', 'proto-loader'));

const addr = process.env.SLUICE_ADDR || 'localhost:50051';
const certs = process.env.SLUICE_CERTS || 'certs';
const name = process.env.SLUICE_CLIENT || 'client';
const calls = Number(process.env.CALLS || 60);
const eventsPerCall = Number(process.env.EVENTS || 200);
const service = process.env.SERVICE || 'herd-js';

const serviceConfig = {
  methodConfig: [{
    name: [{ service: 'sluice.v1.IngestService' }],
    retryPolicy: {
      maxAttempts: 5,
      initialBackoff: '0.1s',
      maxBackoff: '1s',
      backoffMultiplier: 2,
      retryableStatusCodes: ['RESOURCE_EXHAUSTED'],
    },
  }],
};

const definition = protoLoader.loadSync(['sluice/v1/ingest.proto'], {
  includeDirs: [path.join(__dirname, '..', '..', 'proto')],
  keepCase: true,
});
const sluice = grpc.loadPackageDefinition(definition).sluice.v1;
const credentials = grpc.credentials.createSsl(
  fs.readFileSync(path.join(certs, 'ca.pem')),
  fs.readFileSync(path.join(certs, `${name}.key`)),
  fs.readFileSync(path.join(certs, `${name}.pem`)),
);
const client = new sluice.IngestService(addr, credentials, {
  'grpc.ssl_target_name_override': 'localhost',
  'grpc.enable_retries': 1,
  'grpc.service_config': JSON.stringify(serviceConfig),
});

const request = () => {
  const now = Date.now();
  return {
    events: Array.from({ length: eventsPerCall }, (_, n) => ({
      id: crypto.randomUUID(),
      service,
      message: `herd event ${n}`,
      timestamp: { seconds: Math.floor(now / 1000), nanos: (now % 1000) * 1e6 },
    })),
  };
};

const started = process.hrtime.bigint();
const seconds = () => Number(process.hrtime.bigint() - started) / 1e9;
let lastOk = 0;
const failures = {};
const publish = () => new Promise((resolve) => {
  client.Publish(request(), { deadline: Date.now() + 60_000 }, (error) => {
    if (error) {
      const key = `${grpc.status[error.code]}: ${error.details.replace(/[0-9]+/g, 'N')}`;
      failures[key] = (failures[key] || 0) + 1;
      resolve(false);
    } else {
      lastOk = seconds();
      resolve(true);
    }
  });
});

client.waitForReady(Date.now() + 10_000, async (error) => {
  if (error) throw error;
  const outcomes = await Promise.all(Array.from({ length: calls }, publish));
  const ok = outcomes.filter(Boolean).length;
  console.log(JSON.stringify({
    client: 'grpc-js', calls, ok, failed: calls - ok, failures, seconds: seconds(), seconds_to_last_ok: lastOk,
  }));
  client.close();
});
