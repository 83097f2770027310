// Herald in React: a provider and three hooks.
//
//   useHeraldStream(topic, { hub })   an EventSource (Mercure SSE) on a topic: messages, status, last id; resumes
//                                     after a drop without losing anything; closed when the component unmounts.
//   <CentrifugeProvider url=…>        one WebSocket connection (the `centrifuge` SDK) for the tree below it.
//   useCentrifugeState()              that connection's state.
//   useCentrifugeChannel(channel)     a subscription: publications, state, publish(); recovers what was missed
//                                     after a drop; unsubscribed when the last component using it unmounts.
import { Centrifuge } from 'centrifuge';
import { createContext, useCallback, useContext, useEffect, useRef, useState, useSyncExternalStore } from 'react';

/**
 * Subscribes to a Mercure topic with EventSource; a new topic opens a new stream. The browser reconnects by
 * itself after a drop and sends `Last-Event-ID`, and Herald replays what was published meanwhile; when the
 * browser gives up (the stream is CLOSED, e.g. Herald answered an error while restarting) this opens a new
 * stream from the last id seen.
 *
 * @param {string} topic
 * @param {{ hub: string, lastEventId?: string, withCredentials?: boolean, keep?: number }} options
 *   lastEventId: where to start (`earliest` replays the retained history first); keep: messages kept
 */
export function useHeraldStream(topic, { hub, lastEventId = null, withCredentials = false, keep = 100 }) {
  const [messages, setMessages] = useState([]); // { id, type, data } (data parsed as JSON when it is JSON)
  const [status, setStatus] = useState('connecting'); // connecting | open | reconnecting | closed
  const lastId = useRef(lastEventId);
  const [shownId, setShownId] = useState(lastEventId);

  useEffect(() => {
    if (!topic) return undefined;
    let source = null, timer = null, retry = 1000;
    lastId.current = lastEventId; // a new topic starts where asked, not where the previous one was
    setMessages([]);
    setStatus('connecting');
    function open(from) {
      const url = new URL('/.well-known/mercure', hub);
      url.searchParams.append('topic', topic);
      if (from) url.searchParams.set('lastEventID', from);
      const es = new EventSource(url, { withCredentials });
      source = es;
      es.onopen = () => { setStatus('open'); retry = 1000; };
      es.onmessage = (e) => {
        lastId.current = e.lastEventId;
        setShownId(e.lastEventId);
        let data = e.data;
        try { data = JSON.parse(e.data); } catch { /* text */ }
        setMessages((m) => [...m, { id: e.lastEventId, type: e.type, data }].slice(-keep));
      };
      es.onerror = () => {
        if (es.readyState === EventSource.CLOSED) {
          setStatus('closed');
          timer = setTimeout(() => open(lastId.current), retry);
          retry = Math.min(retry * 2, 15000);
        } else {
          setStatus('reconnecting');
        }
      };
    }
    open(lastId.current);
    return () => { clearTimeout(timer); source?.close(); };
  }, [topic, hub, lastEventId, withCredentials, keep]);

  return { messages, status, lastEventId: shownId };
}

const CentrifugeContext = createContext(null);

/** One connection for the tree below: `<CentrifugeProvider url="ws://…/connection/websocket" options={{ getToken }}>`. */
export function CentrifugeProvider({ url, options, children }) {
  const [client] = useState(() => new Centrifuge(url, options));
  useEffect(() => {
    client.connect();
    return () => client.disconnect();
  }, [client]);
  return <CentrifugeContext.Provider value={client}>{children}</CentrifugeContext.Provider>;
}

export function useCentrifuge() {
  const client = useContext(CentrifugeContext);
  if (!client) throw new Error('useCentrifuge: render inside <CentrifugeProvider>');
  return client;
}

/** The connection's state: disconnected | connecting | connected. */
export function useCentrifugeState() {
  const client = useCentrifuge();
  const subscribe = useCallback((onChange) => {
    client.on('state', onChange);
    return () => client.removeListener('state', onChange);
  }, [client]);
  return useSyncExternalStore(subscribe, () => client.state);
}

// Components sharing a channel share its subscription: it ends when the last one lets go.
const shared = new Map(); // channel -> { sub, users }

function acquire(client, channel, options) {
  let entry = shared.get(channel);
  if (!entry) {
    entry = { sub: client.newSubscription(channel, options), users: 0 };
    shared.set(channel, entry);
    entry.sub.subscribe();
  }
  entry.users++;
  return entry.sub;
}

function release(client, channel) {
  const entry = shared.get(channel);
  if (!entry || --entry.users > 0) return;
  shared.delete(channel);
  entry.sub.unsubscribe();
  client.removeSubscription(entry.sub);
}

/**
 * Subscribes to a Centrifugo channel on the provider's connection. With `recoverable: true` (the default here)
 * the SDK resubscribes after a drop asking for what it missed, and Herald sends it (`recovered`); a namespace
 * needs `recovery = true` for that.
 *
 * @param {string} channel
 * @param {{ keep?: number } & Record<string, unknown>} options  keep: publications kept; the rest are the SDK's
 *   subscription options (joinLeave, since, …), read when the channel is first subscribed
 */
export function useCentrifugeChannel(channel, { keep = 100, ...options } = {}) {
  const client = useCentrifuge();
  const [publications, setPublications] = useState([]); // { offset, data, info }
  const [state, setState] = useState('unsubscribed'); // unsubscribed | subscribing | subscribed
  const [error, setError] = useState(null); // { code, message } of a refusal (102, 103, …)
  const [recovered, setRecovered] = useState(null); // after a resubscription: was everything missed sent?
  const sub = useRef(null);
  const opts = useRef(options);

  useEffect(() => {
    if (!channel) return undefined;
    setPublications([]);
    setError(null);
    const s = acquire(client, channel, { recoverable: true, ...opts.current });
    sub.current = s;
    setState(s.state);
    const handlers = {
      state: (ctx) => setState(ctx.newState),
      subscribed: (ctx) => { if (ctx.wasRecovering) setRecovered(ctx.recovered); },
      publication: (ctx) => setPublications((p) => [...p, { offset: ctx.offset, data: ctx.data, info: ctx.info }].slice(-keep)),
      unsubscribed: (ctx) => { if (ctx.code >= 100) setError({ code: ctx.code, message: ctx.reason }); },
      error: (ctx) => setError(ctx.error),
    };
    for (const [event, fn] of Object.entries(handlers)) s.on(event, fn);
    return () => {
      for (const [event, fn] of Object.entries(handlers)) s.removeListener(event, fn);
      release(client, channel);
      sub.current = null;
      setState('unsubscribed');
    };
  }, [client, channel, keep]);

  /** Publishes into the channel (the namespace must let clients publish). */
  const publish = useCallback((data) => {
    if (!sub.current) return Promise.reject(new Error('not subscribed'));
    return sub.current.publish(data);
  }, []);
  return { publications, state, error, recovered, publish };
}
