#!/usr/bin/env node
// A bot backend's side of a handoff, on @grpc/grpc-js: hands one conversation to a human
// agent through the handoff service, relays the user's messages, and prints what the agent
// does as JSON lines on stdout until the handoff ends. See README.md in this folder.
//
//   HANDOFF_ADDR=127.0.0.1:50051 node bot.js [conversation-id] [--heartbeats]
//
// stdout carries one JSON object per line and nothing else; diagnostics go to stderr.
// Exit codes: 0 once the handoff has ended, 1 on an error retrying cannot fix, 130/143 when
// interrupted.
'use strict';

const crypto = require('node:crypto');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

// --- settings ------------------------------------------------------------------------------

const env = process.env;
const args = process.argv.slice(2);

function intSetting(name, fallback) {
  const raw = env[name];
  if (raw === undefined || raw === '') return fallback;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < 0) fail(`${name} must be a whole number >= 0, not ${JSON.stringify(raw)}`);
  return value;
}

function listSetting(name) {
  const raw = env[name];
  if (raw === undefined || raw === '') return [];
  let value;
  try {
    value = JSON.parse(raw);
  } catch (err) {
    fail(`${name} must be a JSON list of strings: ${err.message}`);
  }
  if (!Array.isArray(value) || !value.every((item) => typeof item === 'string' && item !== '')) {
    fail(`${name} must be a JSON list of non-empty strings`);
  }
  return value;
}

const settings = {
  address: env.HANDOFF_ADDR || '127.0.0.1:50051',
  // One of the service's GRPC_AUTH_TOKENS, sent as 'authorization: Bearer <token>'.
  token: env.HANDOFF_TOKEN || '',
  protoPath: env.HANDOFF_PROTO || path.resolve(__dirname, '../../protos/handoff/v1/handoff.proto'),
  conversationId:
    args.find((arg) => !arg.startsWith('--')) ||
    env.CONVERSATION_ID ||
    `node-example-${crypto.randomBytes(4).toString('hex')}`,
  printHeartbeats: args.includes('--heartbeats') || env.BOT_HEARTBEATS === '1',
  user: {
    id: env.BOT_USER_ID || 'u-1042',
    name: env.BOT_USER_NAME || 'Ada L.',
    email: env.BOT_USER_EMAIL || 'ada@example.org',
  },
  firstMessage: env.BOT_FIRST_MESSAGE || 'Hello, the mug in my order #1042 arrived broken.',
  // Further user messages: the next one goes out each time an agent message arrives.
  messages: listSetting('MESSAGES'),
  callTimeoutMs: intSetting('BOT_CALL_TIMEOUT_MS', 15000),
  retryAttempts: intSetting('BOT_RETRY_ATTEMPTS', 8), // per unary call
  reconnectAttempts: intSetting('BOT_RECONNECT_ATTEMPTS', 30), // failed reconnections in a row
  backoffInitialMs: intSetting('BOT_BACKOFF_INITIAL_MS', 200),
  backoffMaxMs: intSetting('BOT_BACKOFF_MAX_MS', 5000),
  // No item (event or heartbeat) for this long: the connection is presumed dead. The
  // service sends a heartbeat every HANDOFF_HEARTBEAT_SECONDS (15 s by default). 0: off.
  streamIdleTimeoutMs: intSetting('BOT_STREAM_IDLE_TIMEOUT_MS', 45000),
};

// --- output --------------------------------------------------------------------------------

function emit(line) {
  process.stdout.write(`${JSON.stringify(line)}\n`);
}

function note(text) {
  process.stderr.write(`bot: ${text}\n`);
}

function fail(text) {
  process.stderr.write(`bot: error: ${text}\n`);
  process.exit(1);
}

const codeName = (code) =>
  Object.keys(grpc.status).find((name) => grpc.status[name] === code) || String(code);

function describeError(err) {
  return `${codeName(err.code)}: ${err.details || err.message}`;
}

// --- gRPC client ---------------------------------------------------------------------------

const packageDefinition = (() => {
  try {
    return protoLoader.loadSync(settings.protoPath, {
      keepCase: true, // field names as in the proto: handoff_id, after_cursor...
      longs: String,
      enums: String, // "END_REASON_AGENT_CLOSED" rather than 1
      defaults: true,
      oneofs: true, // item.item === "event", event.payload === "agent_message"...
    });
  } catch (err) {
    return fail(`cannot load the proto ${settings.protoPath} (set HANDOFF_PROTO): ${err.message}`);
  }
})();
const HandoffService = grpc.loadPackageDefinition(packageDefinition).handoff.v1.HandoffService;
const client = new HandoffService(settings.address, grpc.credentials.createInsecure(), {
  // After the service went away, try to reconnect soon rather than after grpc's default 1 s+.
  'grpc.initial_reconnect_backoff_ms': Math.max(100, settings.backoffInitialMs),
  'grpc.max_reconnect_backoff_ms': Math.max(100, settings.backoffMaxMs),
});

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Exponential backoff with jitter: attempt 1 waits about BOT_BACKOFF_INITIAL_MS. */
function backoffMs(attempt) {
  const ceiling = Math.min(settings.backoffMaxMs, settings.backoffInitialMs * 2 ** (attempt - 1));
  return Math.round(ceiling / 2 + (Math.random() * ceiling) / 2);
}

/** Per-call metadata: the bearer token when the service requires one. */
function callMetadata() {
  const metadata = new grpc.Metadata();
  if (settings.token) metadata.set('authorization', `Bearer ${settings.token}`);
  return metadata;
}

function unary(method, request) {
  return new Promise((resolve, reject) => {
    const deadline = Date.now() + settings.callTimeoutMs;
    client[method](request, callMetadata(), { deadline }, (err, response) =>
      err ? reject(err) : resolve(response),
    );
  });
}

// Worth trying again with the same request: StartHandoff is idempotent per conversation_id
// and SendMessage per client_message_id, so a retry never posts anything twice.
const RETRY_CODES = new Set([
  grpc.status.UNAVAILABLE, // service restarting, Brevo or the store unreachable
  grpc.status.CANCELLED, // cut by a server that is stopping (this bot never cancels a call)
  grpc.status.DEADLINE_EXCEEDED,
  grpc.status.ABORTED, // the handoff was busy on another replica
  grpc.status.RESOURCE_EXHAUSTED, // Brevo's rate limit; the message says how long to wait
]);

// grpc-js reports a connection cut under a call (e.g. the server going away) as INTERNAL
// "Received RST_STREAM ..."; unlike the service's own INTERNAL errors, it is transient.
const isConnectionReset = (err) =>
  err.code === grpc.status.INTERNAL &&
  /RST_STREAM|ECONNRESET|Session closed|socket hang up/i.test(err.details || '');

async function callWithRetry(method, request) {
  for (let attempt = 1; ; attempt += 1) {
    try {
      return await unary(method, request);
    } catch (err) {
      const retryable = RETRY_CODES.has(err.code) || isConnectionReset(err);
      if (!retryable || attempt >= settings.retryAttempts) {
        throw Object.assign(err, { rpc: method });
      }
      let delay = backoffMs(attempt);
      const wait = /retry after ([\d.]+) s/.exec(err.details || '');
      if (err.code === grpc.status.RESOURCE_EXHAUSTED && wait) {
        delay = Math.max(delay, Math.ceil(Number(wait[1]) * 1000));
      }
      note(`${method} failed (${describeError(err)}); retry ${attempt} in ${delay} ms`);
      await sleep(delay);
    }
  }
}

// --- the handoff ---------------------------------------------------------------------------

let ended = false; // set once HandoffEnded arrived: what is still running may stop

async function startHandoff() {
  const response = await callWithRetry('StartHandoff', {
    conversation_id: settings.conversationId,
    user: settings.user,
    title: 'Damaged order',
    description: 'The customer wants a replacement for a broken item.',
    history: [
      { role: 'ROLE_USER', text: 'My order #1042 arrived damaged.' },
      { role: 'ROLE_BOT', text: 'Sorry about that! Let me get you a human.' },
    ],
    metadata: { source: 'node-example' },
  });
  const handoff = response.handoff;
  emit({
    type: 'handoff_started',
    handoff_id: handoff.id,
    conversation_id: handoff.conversation_id,
    visitor_id: handoff.visitor_id,
    created: response.created,
  });
  return handoff;
}

/** User messages go out one at a time, in order, whatever else happens meanwhile. */
class Outbox {
  constructor(handoffId) {
    this.handoffId = handoffId;
    this.count = 0;
    this.queue = Promise.resolve();
  }

  send(text) {
    this.count += 1;
    // The same message number and text give the same id: a retry, even by a restarted bot
    // with the same conversation id, is recognised as a duplicate and posted once.
    const digest = crypto.createHash('sha256').update(text).digest('hex').slice(0, 16);
    const clientMessageId = `msg-${this.count}-${digest}`;
    this.queue = this.queue.then(async () => {
      if (ended) return;
      try {
        const response = await callWithRetry('SendMessage', {
          handoff_id: this.handoffId,
          client_message_id: clientMessageId,
          text,
        });
        emit({
          type: 'message_sent',
          client_message_id: clientMessageId,
          text,
          brevo_message_id: response.brevo_message_id,
          duplicate: response.duplicate,
        });
      } catch (err) {
        if (ended) return; // the agent closed the chat first: nobody left to read it
        fail(`${err.rpc || 'SendMessage'} failed: ${describeError(err)}`);
      }
    });
    return this.queue;
  }
}

function timestamp(value) {
  if (!value) return null;
  return new Date(Number(value.seconds) * 1000 + Math.floor(value.nanos / 1e6)).toISOString();
}

function agentOf(agent) {
  return { id: agent ? agent.id : '', name: agent ? agent.name : '' };
}

/** One event as the JSON line printed for it. */
function eventLine(event) {
  const common = { cursor: event.cursor, handoff_id: event.handoff_id };
  const at = { occurred_at: timestamp(event.occurred_at) };
  switch (event.payload) {
    case 'agent_message': {
      const message = event.agent_message;
      const line = {
        type: 'agent_message',
        ...common,
        agent: agentOf(message.agent),
        text: message.text,
        brevo_message_id: message.brevo_message_id,
      };
      if (message.attachments.length > 0) {
        line.attachments = message.attachments.map((a) => ({
          url: a.url,
          name: a.name,
          mime_type: a.mime_type,
          kind: a.kind,
        }));
      }
      return { ...line, ...at };
    }
    case 'agent_joined':
      return { type: 'agent_joined', ...common, agent: agentOf(event.agent_joined.agent), ...at };
    case 'no_agent_available':
      return { type: 'no_agent_available', ...common, ...at };
    case 'handoff_ended':
      return { type: 'handoff_ended', ...common, reason: event.handoff_ended.reason, ...at };
    default:
      return { type: 'unknown_event', ...common, payload: event.payload || null, ...at };
  }
}

// How a stream that ended without HandoffEnded is resumed.
function resumeKind(err) {
  switch (err.code) {
    case grpc.status.OK: // completed early (a proxy?): carry on from the cursor
    case grpc.status.UNAVAILABLE: // service restarting or shutting down; connection lost
    case grpc.status.CANCELLED: // the server cancelled the stream while stopping
    case grpc.status.RESOURCE_EXHAUSTED: // this reader fell too far behind
    case grpc.status.ABORTED:
    case grpc.status.DEADLINE_EXCEEDED:
      return 'resume';
    case grpc.status.INTERNAL: // a connection reset mid-stream; not the service's own errors
      return isConnectionReset(err) ? 'resume' : 'fatal';
    case grpc.status.OUT_OF_RANGE: // the log no longer holds the cursor: start over
      return 'restart';
    default: // INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, UNAUTHENTICATED...
      return 'fatal';
  }
}

let currentCall = null;

/**
 * Reads one stream until it ends. Resolves with the status it ended with ({code: OK} when
 * it completed); never rejects.
 */
function readStream(request, onItem) {
  return new Promise((resolve) => {
    const call = client.StreamAgentReplies(request, callMetadata());
    currentCall = call;
    let settled = false;
    let idleTimer = null;
    let idle = false;
    const finish = (status) => {
      if (settled) return;
      settled = true;
      clearTimeout(idleTimer);
      if (currentCall === call) currentCall = null;
      if (idle) {
        resolve({
          code: grpc.status.UNAVAILABLE,
          details: `nothing received for ${settings.streamIdleTimeoutMs} ms`,
        });
      } else {
        resolve(status);
      }
    };
    const armIdleTimer = () => {
      if (settings.streamIdleTimeoutMs <= 0) return;
      clearTimeout(idleTimer);
      idleTimer = setTimeout(() => {
        idle = true;
        call.cancel();
      }, settings.streamIdleTimeoutMs);
    };
    armIdleTimer();
    call.on('data', (item) => {
      armIdleTimer();
      onItem(item, call);
    });
    call.on('error', (err) => finish(err));
    call.on('status', (status) => {
      // 'status' follows 'end' on success and 'error' on failure; a success ends here.
      if (status.code === grpc.status.OK) finish(status);
    });
  });
}

async function followReplies(handoffId, outbox) {
  let cursor = ''; // the last cursor received: where to resume
  let failures = 0; // reconnections in a row that received nothing
  let dedupe = null; // after a restart without cursor: what was printed already
  const printedMessages = new Set();
  const printedJoins = new Set();

  const onItem = (item, call) => {
    failures = 0;
    if (item.item === 'heartbeat') {
      if (settings.printHeartbeats) emit({ type: 'heartbeat', sent_at: timestamp(item.heartbeat.sent_at) });
      return;
    }
    const event = item.event;
    if (ended) return;
    if (event.cursor) cursor = event.cursor;
    const messageId = event.payload === 'agent_message' ? event.agent_message.brevo_message_id : '';
    const joinId = event.payload === 'agent_joined' ? agentOf(event.agent_joined.agent).id : '';
    if (dedupe && ((messageId && printedMessages.has(messageId)) || (joinId && printedJoins.has(joinId)))) {
      return; // replayed from the beginning after OUT_OF_RANGE: printed before
    }
    if (messageId) printedMessages.add(messageId);
    if (joinId) printedJoins.add(joinId);
    emit(eventLine(event));
    if (event.payload === 'agent_message' && outbox.count - 1 < settings.messages.length) {
      outbox.send(settings.messages[outbox.count - 1]); // the next scripted user message
    }
    if (event.payload === 'handoff_ended') {
      ended = true;
      // The stream completes by itself after HandoffEnded; don't wait forever if it doesn't.
      setTimeout(() => call.cancel(), 5000).unref();
    }
  };

  for (;;) {
    const status = await readStream({ handoff_id: handoffId, after_cursor: cursor }, onItem);
    if (ended) return;
    const kind = resumeKind(status);
    if (kind === 'fatal') {
      fail(`StreamAgentReplies failed: ${describeError(status)}`);
    }
    failures += 1;
    if (failures > settings.reconnectAttempts) {
      fail(`StreamAgentReplies failed ${failures} times in a row, last: ${describeError(status)}`);
    }
    const delay = backoffMs(failures);
    const line = {
      type: 'reconnecting',
      after_cursor: cursor,
      code: codeName(status.code),
      details: status.details || '',
      attempt: failures,
      delay_ms: delay,
    };
    if (kind === 'restart') {
      // The service says: the log no longer holds that cursor, reconnect without it.
      // Everything is replayed; what was printed already is skipped by its id.
      cursor = '';
      line.after_cursor = '';
      line.restart = true;
      dedupe = true;
    }
    emit(line);
    await sleep(delay);
  }
}

async function main() {
  for (const signal of ['SIGINT', 'SIGTERM']) {
    process.on(signal, () => {
      if (currentCall) currentCall.cancel();
      client.close();
      process.exit(signal === 'SIGINT' ? 130 : 143);
    });
  }
  const handoff = await startHandoff();
  const outbox = new Outbox(handoff.id);
  await outbox.send(settings.firstMessage);
  await followReplies(handoff.id, outbox);
  client.close();
}

main().catch((err) => {
  if (err && err.code !== undefined && err.rpc) fail(`${err.rpc} failed: ${describeError(err)}`);
  fail(err && err.stack ? err.stack : String(err));
});
