'use strict';
// Emits logs through the stock OpenTelemetry JS SDK (@opentelemetry/sdk-logs, a batch
// processor and @opentelemetry/exporter-logs-otlp-grpc) to sluice over mTLS, configured the
// way the exporter documents it: the endpoint and the certificate files from OTEL_* variables.
//
//   OTEL_EXPORTER_OTLP_LOGS_ENDPOINT=https://localhost:50051 \
//   OTEL_EXPORTER_OTLP_LOGS_CERTIFICATE=certs/ca.pem \
//   OTEL_EXPORTER_OTLP_LOGS_CLIENT_CERTIFICATE=certs/client.pem \
//   OTEL_EXPORTER_OTLP_LOGS_CLIENT_KEY=certs/client.key RECORDS=500 node emit_logs.js
//
// Prints one JSON line: { records, export_errors }.
const { LoggerProvider, BatchLogRecordProcessor } = require('@opentelemetry/sdk-logs');
const { OTLPLogExporter } = require('@opentelemetry/exporter-logs-otlp-grpc');
const { resourceFromAttributes } = require('@opentelemetry/resources');
const { SeverityNumber } = require('@opentelemetry/api-logs');
const { diag, DiagLogLevel } = require('@opentelemetry/api');

const records = Number(process.env.RECORDS || 500);
let exportErrors = 0;
const errors = [];
diag.setLogger({
  error: (...args) => { exportErrors += 1; errors.push(args.map(String).join(' ')); },
  warn: () => {}, info: () => {}, debug: () => {}, verbose: () => {},
}, DiagLogLevel.ERROR);

async function main() {
  const exporter = new OTLPLogExporter();
  const processor = new BatchLogRecordProcessor({ exporter });
  const provider = new LoggerProvider({
    resource: resourceFromAttributes({ 'service.name': process.env.SERVICE || 'node-orders' }),
    processors: [processor],
  });
  const logger = provider.getLogger('emit_logs', '1.0.0');
  for (let n = 0; n < records; n += 1) {
    logger.emit({
      severityNumber: n === 0 ? SeverityNumber.ERROR : SeverityNumber.INFO,
      severityText: n === 0 ? 'ERROR' : 'INFO',
      body: n === 0 ? 'order failed' : `order ${n}`,
      attributes: n === 0 ? { 'enduser.id': 'node-user', 'order.id': n } : { 'order.id': n },
    });
  }
  await provider.forceFlush();
  await provider.shutdown();
  console.log(JSON.stringify({ records, export_errors: exportErrors, errors: errors.slice(0, 5) }));
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
