import { useState } from 'react';

import { useCentrifugeChannel, useHeraldStream } from '../herald.jsx';

const label = (data) => (data !== null && typeof data === 'object' && 'text' in data ? data.text : JSON.stringify(data));

export default function LiveFeed({ channel, hub }) {
  // The same channel both ways: SSE reads what WebSocket clients publish, and the other way round.
  const { messages, status, lastEventId } = useHeraldStream(channel, { hub });
  const { publications, state, error, recovered, publish } = useCentrifugeChannel(channel);
  const [text, setText] = useState('');
  const [sendError, setSendError] = useState('');

  async function send(e) {
    e.preventDefault();
    if (!text.trim()) return;
    try {
      await publish({ text: text.trim(), at: Date.now() });
      setText('');
      setSendError('');
    } catch (err) {
      setSendError(`not sent: ${err.message} (${err.code ?? ''})`);
    }
  }

  return (
    <main>
      <section>
        <h2>EventSource <code>useHeraldStream</code> <span id="sse-status" className={`pill ${status}`}>{status}</span></h2>
        <p className="meta">topic {channel} · last id <code id="sse-last-id">{lastEventId ?? '–'}</code></p>
        <ul id="sse-list">
          {messages.map((m) => <li key={m.id}>{label(m.data)}</li>)}
        </ul>
      </section>
      <section>
        <h2>WebSocket <code>useCentrifugeChannel</code> <span id="sub-state" className={`pill ${state}`}>{state}</span></h2>
        <p className="meta">
          channel {channel}
          {recovered !== null && <span id="recovered"> · after the last drop: {recovered ? 'everything missed was recovered' : 'could not recover it all'}</span>}
        </p>
        {error && <p id="sub-error" className="error">{error.message} ({error.code})</p>}
        <ul id="ws-list">
          {publications.map((p) => <li key={p.offset}>{label(p.data)}</li>)}
        </ul>
        <form id="publish" onSubmit={send}>
          <input id="text" value={text} onChange={(e) => setText(e.target.value)} placeholder="publish from the browser" autoComplete="off" />
          <button disabled={state !== 'subscribed'}>Publish</button>
        </form>
        {sendError && <p className="error">{sendError}</p>}
      </section>
    </main>
  );
}
