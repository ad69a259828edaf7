'use strict';
// A small sluice client on @grpc/grpc-js. It loads the protos from ../../proto at run time and
// gets delivery right by default:
// - every event gets a client-side id when it has none, so a resend is stored once;
// - `publish` retries RESOURCE_EXHAUSTED and UNAVAILABLE after the server's
//   grpc-retry-pushback-ms (the same delay as its google.rpc.RetryInfo);
// - `ingestStream` keeps a window of requests in flight, and its unacknowledged events within
//   the server's credit (an ack's credit_events), and resends a refused request (an ack with a
//   non-zero code) after the ack's retry_after.
const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_DIR = path.join(__dirname, '..', '..', 'proto');
const SERVICE_CONFIG = path.join(__dirname, '..', 'service-config.json');

const definition = protoLoader.loadSync(['sluice/v1/ingest.proto', 'sluice/v1/query.proto'], {
  includeDirs: [PROTO_DIR],
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
});
const sluice = grpc.loadPackageDefinition(definition).sluice.v1;

const RETRYABLE = new Set([grpc.status.RESOURCE_EXHAUSTED, grpc.status.UNAVAILABLE]);

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** The server's pushback (ms) on a refused call, else `fallback`. */
function retryDelay(error, fallback = 500) {
  const pushback = error.metadata && error.metadata.get('grpc-retry-pushback-ms')[0];
  const ms = Number(pushback);
  return Number.isFinite(ms) && ms > 0 ? ms : fallback;
}

/** A google.protobuf.Duration (as proto-loader gives it) in milliseconds. */
function durationMs(duration) {
  if (!duration) return 0;
  return Number(duration.seconds || 0) * 1000 + Math.ceil(Number(duration.nanos || 0) / 1e6);
}

/**
 * `object` as a google.protobuf.Struct (metadata). proto-loader takes the well-known types from
 * protobufjs, whose field names are camelCase whatever `keepCase` says.
 */
function toStruct(object) {
  const toValue = (value) => {
    if (value === null || value === undefined) return { nullValue: 'NULL_VALUE' };
    if (typeof value === 'number') return { numberValue: value };
    if (typeof value === 'string') return { stringValue: value };
    if (typeof value === 'boolean') return { boolValue: value };
    if (Array.isArray(value)) return { listValue: { values: value.map(toValue) } };
    return { structValue: toStruct(value) };
  };
  return { fields: Object.fromEntries(Object.entries(object).map(([k, v]) => [k, toValue(v)])) };
}

/** An event as the server takes it: id filled in, timestamp from a Date or now. */
function toEvent(event) {
  const at = event.timestamp instanceof Date ? event.timestamp : new Date(event.timestamp || Date.now());
  const millis = at.getTime();
  return {
    id: event.id || crypto.randomUUID(),
    service: event.service,
    message: event.message,
    timestamp: { seconds: Math.floor(millis / 1000), nanos: (millis % 1000) * 1e6 },
    user_id: event.user_id || '',
    metadata: event.metadata ? toStruct(event.metadata) : undefined,
  };
}

class Client {
  /**
   * @param {object} options
   * @param {string} [options.addr] host:port (default localhost:50051)
   * @param {string} [options.certs] directory with ca.pem, client.pem, client.key (default certs)
   * @param {string} [options.token] bearer token (JWT), when the server wants one
   * @param {string} [options.serverName] name the server certificate holds (default localhost)
   */
  constructor({ addr = 'localhost:50051', certs = 'certs', ca, cert, key, token, serverName = 'localhost' } = {}) {
    const read = (file, fallback) => fs.readFileSync(file || path.join(certs, fallback));
    const credentials = grpc.credentials.createSsl(read(ca, 'ca.pem'), read(key, 'client.key'), read(cert, 'client.pem'));
    const options = {
      'grpc.ssl_target_name_override': serverName,
      'grpc.enable_retries': 1,
      'grpc.service_config': fs.readFileSync(SERVICE_CONFIG, 'utf8'),
    };
    this.ingest = new sluice.IngestService(addr, credentials, options);
    this.read = new sluice.QueryService(addr, credentials, options);
    this.token = token;
  }

  metadata() {
    const metadata = new grpc.Metadata();
    if (this.token) metadata.set('authorization', `Bearer ${this.token}`);
    return metadata;
  }

  unary(client, method, request) {
    return new Promise((resolve, reject) => {
      client[method](request, this.metadata(), (error, response) => (error ? reject(error) : resolve(response)));
    });
  }

  /** Publishes events in one request, resending after refusals; resolves to the IngestResponse. */
  async publish(events, { maxAttempts = 20 } = {}) {
    const request = { events: events.map(toEvent) };
    for (let attempt = 1; ; attempt += 1) {
      try {
        return await this.unary(this.ingest, 'Publish', request);
      } catch (error) {
        if (!RETRYABLE.has(error.code) || attempt >= maxAttempts) throw error;
        await sleep(retryDelay(error));
      }
    }
  }

  /**
   * Streams events over IngestStream in requests of `batch` events with `window` in flight,
   * and no more unacknowledged events than the server's last credit (one request always may
   * be). A refused request is resent after its ack's retry_after. Resolves to
   * { accepted, rejected, rejections, resent, heldByCredit } once every request is
   * acknowledged.
   */
  ingestStream(events, { batch = 500, window = 4 } = {}) {
    const batches = [];
    const all = events.map(toEvent);
    for (let start = 0; start < all.length; start += batch) batches.push(all.slice(start, start + batch));
    const totals = { accepted: 0, rejected: 0, rejections: [], resent: 0, heldByCredit: 0 };
    return new Promise((resolve, reject) => {
      const call = this.ingest.IngestStream(this.metadata());
      const pending = new Map();
      let sequence = 0;
      let next = 0;
      let waiting = 0;
      let ended = false;
      // The server's credit: null until an ack carries one (older servers send none).
      let credit = null;
      const inFlight = () => {
        let events = 0;
        for (const requestEvents of pending.values()) events += requestEvents.length;
        return events;
      };
      const withinCredit = () => {
        if (credit === null) return true;
        const held = inFlight();
        const ok = held === 0 || held + batch <= credit;
        if (!ok) totals.heldByCredit += 1;
        return ok;
      };
      const write = (requestEvents) => {
        const tag = sequence;
        sequence += 1;
        pending.set(tag, requestEvents);
        call.write({ events: requestEvents, sequence: tag });
      };
      const pump = () => {
        while (next < batches.length && pending.size + waiting < window && withinCredit()) {
          write(batches[next]);
          next += 1;
        }
        if (!ended && next >= batches.length && pending.size === 0 && waiting === 0) {
          ended = true;
          call.end();
        }
      };
      call.on('data', (ack) => {
        const requestEvents = pending.get(ack.sequence);
        pending.delete(ack.sequence);
        if (requestEvents === undefined) return;
        if (ack.code !== 0) {
          totals.resent += 1;
          waiting += 1;
          setTimeout(() => {
            waiting -= 1;
            write(requestEvents);
            pump();
          }, durationMs(ack.retry_after) || 200);
          return;
        }
        // proto3 `optional`: proto-loader names a present field in its synthetic oneof.
        if (ack._credit_events === 'credit_events') credit = Number(ack.credit_events);
        totals.accepted += ack.accepted;
        totals.rejected += ack.rejected;
        totals.rejections.push(...ack.rejections);
        pump();
      });
      call.on('error', reject);
      call.on('end', () => resolve(totals));
      pump();
    });
  }

  /** One page of events (QueryRequest fields, snake_case). */
  query(request) {
    return this.unary(this.read, 'Query', request);
  }

  close() {
    this.ingest.close();
    this.read.close();
  }
}

module.exports = { Client, toEvent, retryDelay, grpc };
