// Herald in Vue 3: two composables and a plugin.
//
//   useHeraldStream(topic)        an EventSource (Mercure SSE) on a topic: messages, status, last id; resumes
//                                 after a drop without losing anything; closed when the component unmounts.
//   app.use(createCentrifuge(url)) one WebSocket connection (the `centrifuge` SDK) for the whole app.
//   useCentrifugeState()          that connection's state.
//   useCentrifugeChannel(channel) a subscription: publications, state, publish(); recovers what was missed
//                                 after a drop; unsubscribed when the last component using it unmounts.
import { Centrifuge } from 'centrifuge';
import { inject, onScopeDispose, ref, shallowRef, toValue, watch } from 'vue';

/**
 * Subscribes to a Mercure topic with EventSource. `topic` may be a ref or a getter: a new topic opens a new
 * stream. The browser reconnects by itself after a drop and sends `Last-Event-ID`, and Herald replays what
 * was published meanwhile; when the browser gives up (the stream is CLOSED, e.g. Herald answered an error
 * while restarting) this opens a new stream from the last id seen.
 *
 * @param {string | import('vue').Ref<string> | (() => string)} topic
 * @param {{ hub: string, lastEventId?: string, withCredentials?: boolean, keep?: number }} options
 *   lastEventId: where to start (`earliest` replays the retained history first); keep: messages kept
 */
export function useHeraldStream(topic, { hub, lastEventId = null, withCredentials = false, keep = 100 }) {
  const messages = ref([]); // { id, type, data } (data parsed as JSON when it is JSON)
  const status = ref('connecting'); // connecting | open | reconnecting | closed
  const lastId = ref(lastEventId);
  let source = null, timer = null, retry = 1000;

  function open(name, from) {
    const url = new URL('/.well-known/mercure', hub);
    url.searchParams.append('topic', name);
    if (from) url.searchParams.set('lastEventID', from);
    const es = new EventSource(url, { withCredentials });
    source = es;
    es.onopen = () => { status.value = 'open'; retry = 1000; };
    es.onmessage = (e) => {
      lastId.value = e.lastEventId;
      let data = e.data;
      try { data = JSON.parse(e.data); } catch { /* text */ }
      messages.value = [...messages.value, { id: e.lastEventId, type: e.type, data }].slice(-keep);
    };
    es.onerror = () => {
      if (es.readyState === EventSource.CLOSED) {
        status.value = 'closed';
        timer = setTimeout(() => open(name, lastId.value), retry);
        retry = Math.min(retry * 2, 15000);
      } else {
        status.value = 'reconnecting';
      }
    };
  }

  function close() {
    clearTimeout(timer);
    source?.close();
    source = null;
  }

  watch(() => toValue(topic), (name) => {
    close();
    messages.value = [];
    status.value = 'connecting';
    lastId.value = lastEventId; // a new topic starts where asked, not where the previous one was
    if (name) open(name, lastId.value);
  }, { immediate: true });
  onScopeDispose(close);

  return { messages, status, lastEventId: lastId };
}

const CENTRIFUGE = Symbol('centrifuge');

/** A Vue plugin holding one connection for the app: `app.use(createCentrifuge(url, { getToken }))`. */
export function createCentrifuge(url, options = {}) {
  const client = new Centrifuge(url, options);
  return {
    client,
    install(app) {
      app.provide(CENTRIFUGE, client);
      client.connect();
    },
  };
}

export function useCentrifuge() {
  const client = inject(CENTRIFUGE, null);
  if (!client) throw new Error('useCentrifuge: app.use(createCentrifuge(url)) first');
  return client;
}

/** The connection's state: disconnected | connecting | connected. */
export function useCentrifugeState() {
  const client = useCentrifuge();
  const state = ref(client.state);
  const onState = (ctx) => { state.value = ctx.newState; };
  client.on('state', onState);
  onScopeDispose(() => client.removeListener('state', onState));
  return state;
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
 * Subscribes to a Centrifugo channel on the app's connection. `channel` may be a ref or a getter. With
 * `recoverable: true` (the default here) the SDK resubscribes after a drop asking for what it missed, and
 * Herald sends it (`recovered`); a namespace needs `recovery = true` for that.
 *
 * @param {string | import('vue').Ref<string> | (() => string)} channel
 * @param {{ keep?: number } & Record<string, unknown>} options  keep: publications kept; the rest are the
 *   SDK's subscription options (joinLeave, since, …)
 */
export function useCentrifugeChannel(channel, { keep = 100, ...options } = {}) {
  const client = useCentrifuge();
  const publications = ref([]); // { offset, data, info }
  const state = ref('unsubscribed'); // unsubscribed | subscribing | subscribed
  const error = ref(null); // { code, message } of a refusal (102 unknown channel, 103 permission denied, …)
  const recovered = ref(null); // after a resubscription: did Herald send everything that was missed?
  const sub = shallowRef(null);

  watch(() => toValue(channel), (name, _old, onCleanup) => {
    publications.value = [];
    error.value = null;
    if (!name) return;
    const s = acquire(client, name, { recoverable: true, ...options });
    sub.value = s;
    state.value = s.state;
    const handlers = {
      state: (ctx) => { state.value = ctx.newState; },
      subscribed: (ctx) => { if (ctx.wasRecovering) recovered.value = ctx.recovered; },
      publication: (ctx) => {
        publications.value = [...publications.value, { offset: ctx.offset, data: ctx.data, info: ctx.info }].slice(-keep);
      },
      unsubscribed: (ctx) => { if (ctx.code >= 100) error.value = { code: ctx.code, message: ctx.reason }; },
      error: (ctx) => { error.value = ctx.error; },
    };
    for (const [event, fn] of Object.entries(handlers)) s.on(event, fn);
    onCleanup(() => {
      for (const [event, fn] of Object.entries(handlers)) s.removeListener(event, fn);
      release(client, name);
      sub.value = null;
      state.value = 'unsubscribed';
    });
  }, { immediate: true });

  /** Publishes into the channel (the namespace must let clients publish). */
  const publish = (data) => {
    if (!sub.value) return Promise.reject(new Error('not subscribed'));
    return sub.value.publish(data);
  };
  return { publications, state, error, recovered, publish };
}
