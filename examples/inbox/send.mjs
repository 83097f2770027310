// Sends notifications to a user through Herald's backend API, as an application's backend would:
//   node send.mjs USER [COUNT]
// Each gets a category, a title and, for some, actions; an idempotency key makes a retried send harmless.
const HERALD = process.env.HERALD_URL ?? 'http://127.0.0.1:8080';
const API_KEY = process.env.INBOX_API_KEY ?? 'inbox-example-api-key';
const [user = 'alice', count = '5'] = process.argv.slice(2);

const KINDS = [
  { category: 'ci', title: (n) => `Build #${n} failed`, body: 'The tests of main did not pass.', actions: [{ id: 'retry', label: 'Retry' }] },
  { category: 'comments', title: (n) => `New comment on issue ${n}`, body: 'Looks good to me, one nit.' },
  { category: 'billing', title: (n) => `Invoice ${n} is due`, body: 'Due in 7 days.', actions: [{ id: 'pay', label: 'Pay' }, { id: 'later', label: 'Later' }] },
];

for (let i = 0; i < Number(count); i++) {
  const n = Date.now() % 100000 + i;
  const kind = KINDS[i % KINDS.length];
  const res = await fetch(`${HERALD}/api/inbox_notify`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'x-api-key': API_KEY },
    body: JSON.stringify({
      users: [user],
      item: { category: kind.category, title: kind.title(n), body: kind.body, actions: kind.actions ?? [] },
      idempotency_key: `send-${n}-${i}`,
    }),
  });
  const json = await res.json();
  if (!res.ok) throw new Error(`${json.message} (${json.code})`);
  console.log(`${kind.category}: item ${json.result.delivered[0].id} (${json.result.delivered[0].outcome})`);
}
