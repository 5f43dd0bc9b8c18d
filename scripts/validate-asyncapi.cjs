#!/usr/bin/env node
// Validate an AsyncAPI document with the official parser (@asyncapi/parser) and print a summary.
//
//   NODE_PATH="$(scripts/install-node-tools.sh --print)/node_modules" node scripts/validate-asyncapi.cjs schemas/asyncapi.yaml
//
// Exit status 0 when the document parses without errors (warnings are printed on stderr);
// stdout is a JSON summary (channel -> address and message -> resolved payload $id, header names),
// which tests/unit/test_contracts.py compares with the pydantic models.
'use strict';
const path = require('path');
const { Parser, fromFile } = require('@asyncapi/parser');

const SEVERITY = ['error', 'warning', 'info', 'hint'];

async function main() {
  const file = process.argv[2];
  if (!file) {
    console.error('usage: validate-asyncapi.cjs FILE');
    process.exit(2);
  }
  const parser = new Parser();
  const { document, diagnostics } = await fromFile(parser, path.resolve(file)).parse();
  let errors = 0;
  for (const d of diagnostics) {
    const where = (d.path || []).join('.');
    console.error(`${SEVERITY[d.severity] || d.severity}: ${d.message}${where ? ' at ' + where : ''}`);
    if (d.severity === 0) errors += 1;
  }
  if (!document || errors) {
    console.error(`${file}: ${errors} error(s)`);
    process.exit(1);
  }
  const summary = { asyncapi: document.version(), channels: {}, operations: {} };
  for (const ch of document.channels()) {
    const messages = {};
    for (const m of ch.messages()) {
      const payload = m.hasPayload() ? m.payload().json() : null;
      const headers = m.hasHeaders() ? m.headers().json() : null;
      const kafka = m.bindings().has('kafka') ? m.bindings().get('kafka').value() : {};
      messages[m.id()] = {
        payload_id: payload && payload.$id ? payload.$id : null,
        content_type: m.contentType() || document.defaultContentType() || null,
        headers: headers && headers.properties ? Object.keys(headers.properties).sort() : [],
        header_reason_enum: headers && headers.properties && headers.properties['dlq.reason']
          ? headers.properties['dlq.reason'].enum || null : null,
        key: kafka && kafka.key ? kafka.key : null,
      };
    }
    summary.channels[ch.id()] = { address: ch.address(), messages };
  }
  for (const op of document.operations()) {
    summary.operations[op.id()] = { action: op.action(), channels: op.channels().all().map((c) => c.id()) };
  }
  console.log(JSON.stringify(summary, null, 1));
}

main().catch((err) => {
  console.error(err && err.stack ? err.stack : String(err));
  process.exit(1);
});
