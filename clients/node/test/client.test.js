'use strict';
// Runs against a real sluice server: SLUICE_ADDR (host:port) and SLUICE_CERTS (its dev
// certificate directory) are set by the Rust harness (tests/clients.rs), which started it with
// a small buffer so that streams meet RESOURCE_EXHAUSTED.
const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const { Client, grpc } = require('..');

const addr = process.env.SLUICE_ADDR;
const certs = process.env.SLUICE_CERTS;
if (!addr || !certs) throw new Error('SLUICE_ADDR and SLUICE_CERTS must point at a running server');

const events = (service, count, extra = {}) =>
  Array.from({ length: count }, (_, n) => ({ service, message: `node event ${n}`, ...extra }));

test('mTLS publish, then Query finds the events', async () => {
  const client = new Client({ addr, certs });
  try {
    const response = await client.publish(events('node-query', 3, { user_id: 'u-node', metadata: { via: 'grpc-js' } }));
    assert.equal(response.accepted, 3);
    const page = await client.query({ services: ['node-query'], limit: 10 });
    assert.equal(page.events.length, 3);
    assert.equal(page.events[0].user_id, 'u-node');
    assert.equal(page.events[0].metadata.fields.via.stringValue, 'grpc-js');
  } finally {
    client.close();
  }
});

test('an invalid event is rejected on its own, with its field', async () => {
  const client = new Client({ addr, certs });
  try {
    const response = await client.publish([...events('node-ok', 1), { service: 'Not A Service', message: 'x' }]);
    assert.equal(response.accepted, 1);
    assert.equal(response.rejected, 1);
    assert.equal(response.rejections[0].field, 'service');
    assert.equal(response.rejections[0].index, 1);
  } finally {
    client.close();
  }
});

test('a full buffer is retried after retry_after until every event is stored', async () => {
  const client = new Client({ addr, certs });
  try {
    const totals = await client.ingestStream(events('node-stream', 3000), { batch: 200, window: 8 });
    assert.equal(totals.accepted, 3000);
    assert.equal(totals.rejected, 0);
    assert.ok(totals.resent > 0, `the buffer never filled (resent ${totals.resent})`);
  } finally {
    client.close();
  }
});

test('without a client certificate the server refuses the call', async () => {
  const credentials = grpc.credentials.createSsl(fs.readFileSync(path.join(certs, 'ca.pem')));
  const loader = require('@grpc/proto-loader');
  const definition = loader.loadSync(['sluice/v1/ingest.proto'], {
    includeDirs: [path.join(__dirname, '..', '..', '..', 'proto')],
    keepCase: true,
  });
  const sluice = grpc.loadPackageDefinition(definition).sluice.v1;
  const ingest = new sluice.IngestService(addr, credentials, { 'grpc.ssl_target_name_override': 'localhost' });
  await assert.rejects(
    new Promise((resolve, reject) => ingest.Publish({ events: [] }, (error, response) => (error ? reject(error) : resolve(response)))),
    (error) => error.code === grpc.status.UNAVAILABLE || error.code === grpc.status.UNAUTHENTICATED,
  );
  ingest.close();
});
